"""ringlm.idl"""
