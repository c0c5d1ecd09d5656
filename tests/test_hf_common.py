"""transformers' own common model and configuration tests, run against the KunlunBaize classes as a built-in model's
test file runs them: a model tester with tiny configurations (the full model, every switch off, tied embeddings).

The common files come from the installed transformers' source distribution (see tests/_transformers_common.py);
without it the module skips and says how to get it.
"""

from __future__ import annotations

import unittest
from typing import Any, ClassVar
from unittest import mock

import pytest

pytest.importorskip("transformers")
pytest.importorskip("parameterized", reason="transformers' common tests need parameterized: pip install -e '.[dev]'")

import torch
from transformers.models.auto import modeling_auto

from kunlunbaize.hf import (
    KunlunBaizeConfig,
    KunlunBaizeForCausalLM,
    KunlunBaizeForSequenceClassification,
    KunlunBaizeModel,
)

from . import _transformers_common as common

if not common.SDIST.is_file():
    pytest.skip(common.HOW_TO_GET, allow_module_level=True)

modeling_common, configuration_common = common.load()
ModelTesterMixin = modeling_common.ModelTesterMixin
ids_tensor, random_attention_mask = modeling_common.ids_tensor, modeling_common.random_attention_mask
ConfigTester = configuration_common.ConfigTester

pytestmark = pytest.mark.slow  # transformers' whole common suite, three configurations: minutes


class KunlunBaizeModelTester:
    """Tiny configurations and inputs for the common tests (the role of e.g. ``LlamaModelTester``)."""

    def __init__(self, parent: unittest.TestCase, **switches: Any) -> None:
        self.parent = parent
        self.switches = switches
        self.batch_size = 2
        self.seq_length = 7
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.intermediate_size = 37
        self.max_position_embeddings = 64
        self.num_labels = 3
        self.pad_token_id = 0

    def get_config(self) -> KunlunBaizeConfig:
        values = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                      num_key_value_heads=self.num_key_value_heads, intermediate_size=self.intermediate_size,
                      max_position_embeddings=self.max_position_embeddings, conv_kernel_sizes=[3, 5], mtp_depth=2,
                      num_labels=self.num_labels, pad_token_id=self.pad_token_id, bos_token_id=1, eos_token_id=2)
        values.update(self.switches)
        return KunlunBaizeConfig(**values)

    def prepare_config_and_inputs_for_common(self) -> tuple[KunlunBaizeConfig, dict[str, torch.Tensor]]:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": mask}


AUTO_NAMES = {
    "MODEL_MAPPING_NAMES": "KunlunBaizeModel",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "KunlunBaizeForCausalLM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "KunlunBaizeForSequenceClassification",
}
"""The entries a built-in model has in transformers' name tables (models/auto/modeling_auto.py). The common tests
read those tables, not the registered Auto classes, to know a class's role: which classes are base models (no loss in
``test_training``) and which get labels (causal-LM labels [B, T], class labels [B])."""


class KunlunBaizeCommonTests(ModelTesterMixin, common.GenerationTesterMixin):
    """The common tests for one configuration; subclasses name the switches."""

    all_model_classes = (KunlunBaizeModel, KunlunBaizeForCausalLM, KunlunBaizeForSequenceClassification)
    switches: ClassVar[dict[str, Any]] = {}
    test_can_init_all_missing_weights_before_2023 = True  # the test dates models by a copyright line we do not have
    has_attentions = False  # output_attentions is refused: the fused attention never forms the weights (guide-hf.md)
    # the MTP depths train only through forward(mtp=True) (the joint loss); the plain causal-LM loss leaves them alone
    test_all_params_have_gradient = False

    @classmethod
    def setUpClass(cls) -> None:
        cls._auto_names = [mock.patch.dict(getattr(modeling_auto, table), {"kunlunbaize": name})
                           for table, name in AUTO_NAMES.items()]
        for patch in cls._auto_names:
            patch.start()

    @classmethod
    def tearDownClass(cls) -> None:
        for patch in cls._auto_names:
            patch.stop()

    def setUp(self) -> None:
        self.model_tester = KunlunBaizeModelTester(self, **self.switches)
        # ``d_model`` is the stored name (``hidden_size`` an alias), as GPT-2's tests pass ``n_embd``
        self.config_tester = ConfigTester(self, config_class=KunlunBaizeConfig, d_model=32)

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    def _rope_beyond_the_context(self) -> None:
        self.skipTest("feeds 1.5 × max_position_embeddings tokens, which the model refuses by design (an input longer "
                      "than the context is an error); RoPE scaling is tested against transformers' own functions and "
                      "LlamaForCausalLM past the original context in tests/test_rope_scaling.py")

    test_model_rope_scaling_from_config_0_linear = _rope_beyond_the_context
    test_model_rope_scaling_from_config_1_dynamic = _rope_beyond_the_context
    test_model_rope_scaling_from_config_2_yarn = _rope_beyond_the_context


class TestFullModel(KunlunBaizeCommonTests, unittest.TestCase):
    switches: ClassVar[dict[str, Any]] = {}


class TestSwitchesOff(KunlunBaizeCommonTests, unittest.TestCase):
    switches: ClassVar[dict[str, Any]] = {"dense_residual": False, "transformerx": False, "mtp_depth": 0}
    test_all_params_have_gradient = True  # no MTP depths: every parameter is in the plain loss


class TestTiedEmbeddings(KunlunBaizeCommonTests, unittest.TestCase):
    switches: ClassVar[dict[str, Any]] = {"tie_word_embeddings": True}


def test_config_common_kwargs_cover_every_common_attribute() -> None:
    """The stand-in for transformers' config_common_kwargs sets every public attribute of the installed version's
    base configuration (so ConfigTester.check_config_arguments_init checks them all)."""
    from transformers import PretrainedConfig

    public = {k.lstrip("_") for k in vars(PretrainedConfig()) if not k.startswith("_") or k == "_output_attentions"}
    public -= {"transformers_version", "is_encoder_decoder", "name_or_path"}
    assert public <= set(common.CONFIG_COMMON_KWARGS), public - set(common.CONFIG_COMMON_KWARGS)
