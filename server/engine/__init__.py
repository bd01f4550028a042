"""ringlm.server.engine"""
