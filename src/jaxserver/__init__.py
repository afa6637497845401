"""jaxserver: serve large language models from JAX over HTTP."""

import os

# transformers advises at import that PyTorch is missing; jaxserver takes only tokenizers and chat
# templates from it, so to a user that advice reads as an error.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


from jaxserver.config import JAXServerConfig
from jaxserver.jaxserver import JAXServer
from jaxserver.model.config import ModelConfig

__all__ = ["JAXServer", "JAXServerConfig", "ModelConfig"]
