"""jaxserver: serve large language models from JAX over HTTP."""

from jaxserver.config import JAXServerConfig
from jaxserver.jaxserver import JAXServer
from jaxserver.model.config import ModelConfig

__all__ = ["JAXServer", "JAXServerConfig", "ModelConfig"]
