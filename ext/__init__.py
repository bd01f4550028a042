"""ringlm.ext"""
