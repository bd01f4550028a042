"""ringlm: a language-model serving cluster over Thrift.

The repository root is this package (see setup.py): `ringlm.ext` holds the
Cython tokenizer and sampler, `ringlm.server` the model, engine and Thrift
server, `ringlm.client` the consistent-hash client.
"""

__version__ = "0.1.0"
