"""The Thrift contract, loaded once with thriftpy2: `from ringlm.idl import ringlm_thrift`.

This module object is the only global state in ringlm; its structs,
exceptions and the `Generator` service are what servers and clients speak.
"""

from pathlib import Path

import thriftpy2

IDL_PATH = Path(__file__).with_name("ringlm.thrift")

# module_name makes the generated classes picklable and importable by name.
ringlm_thrift = thriftpy2.load(str(IDL_PATH), module_name="ringlm_thrift")
