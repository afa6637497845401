"""The seed's 24 config fields keep their seed defaults; bad values are rejected with a clear message."""

import pytest
from pydantic import ValidationError

from jaxserver import JAXServerConfig

SEED_DEFAULTS = {
    "host": "0.0.0.0",
    "port": 2059,
    "instruct_format": "### SYSTEM:\n{system}\n### INSTRUCT:\n{instruct}\n### ASSISTANT:\n",
    "chat_format": "<|prompter|>{prompt}</s><|assistant|>{assistant}</s>",
    "system_prefix": "",
    "system": "",
    "prompt_prefix_instruct": "",
    "prompt_postfix_instruct": "",
    "prompt_prefix_chat": "<|prompter|>",
    "prompt_postfix_chat": "</s><|assistant|>",
    "chat_prefix": "",
    "contains_auto_format": True,
    "max_length": 2048,
    "max_new_tokens": 2048,
    "max_compile_tokens": 32,
    "temperature": 0.1,
    "top_p": 0.95,
    "top_k": 50,
    "logging": False,
    "mesh_axes_names": ("dp", "fsdp", "mp"),
    "mesh_axes_shape": (1, -1, 1),
    "seed": 556,
    "use_prefix_tokenizer": True,
}


def test_seed_fields_and_defaults():
    config = JAXServerConfig()
    for name, value in SEED_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.dtype == "auto"  # the one documented change: fp16 is slow on a CPU (README, Configuration)
    assert len(SEED_DEFAULTS) + 1 == 24


@pytest.mark.parametrize(
    "values, field",
    [
        ({"port": 0}, "port"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_compile_tokens": 0}, "max_compile_tokens"),
        ({"dtype": "int3"}, "dtype"),
        ({"instruct_format": "no placeholder"}, "instruct_format"),
        ({"chat_format": "{prompt} only"}, "chat_format"),
        ({"mesh_axes_shape": (1, -1, -1)}, "mesh_axes_shape"),
        ({"mesh_axes_names": ("dp", "fsdp")}, "mesh_axes_names"),
        ({"no_such_field": 1}, "no_such_field"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(values, field):
    with pytest.raises(ValidationError) as info:
        JAXServerConfig(**values)
    assert field in str(info.value)


def test_prompt_format_choice():
    assert not JAXServerConfig().uses_seed_formats(model_has_template=True)
    assert JAXServerConfig().uses_seed_formats(model_has_template=False)
    assert JAXServerConfig(instruct_format="{instruct}").uses_seed_formats(model_has_template=True)
    assert JAXServerConfig(prompt_format="seed").uses_seed_formats(model_has_template=True)
