"""ringlm.server"""
