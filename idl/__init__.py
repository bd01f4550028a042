"""The Thrift contract, loaded once with thriftpy2: `from ringlm.idl import ringlm_thrift`.

This module object is the only global state in ringlm; its structs,
exceptions and the `Generator` service are what servers and clients speak.
The helpers below read and copy any of its structs by field name.
"""

from pathlib import Path

import thriftpy2

IDL_PATH = Path(__file__).with_name("ringlm.thrift")

# module_name makes the generated classes picklable and importable by name.
ringlm_thrift = thriftpy2.load(str(IDL_PATH), module_name="ringlm_thrift")


def to_dict(struct) -> dict:
    """A Thrift struct's fields by name, in the IDL's order (shallow: a nested struct stays a struct)."""
    return {name: getattr(struct, name) for _, name, *_ in struct.thrift_spec.values()}


def copy_struct(struct, **changes):
    """A shallow copy of a Thrift struct with the named fields replaced."""
    return type(struct)(**{**to_dict(struct), **changes})
