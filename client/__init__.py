"""ringlm.client"""
