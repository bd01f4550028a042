"""ringlm.server.model"""
