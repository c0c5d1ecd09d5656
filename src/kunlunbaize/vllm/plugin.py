"""vLLM's `vllm.general_plugins` entry point: registers the KunlunBaize architectures with vLLM's model registry and
routes ``speculative_config={"method": "mtp"}`` on a KunlunBaize export to its MTP depths (:mod:`.mtp`)."""

from __future__ import annotations

import functools
from typing import Any

ARCHITECTURE = "KunlunBaizeForCausalLM"
MTP_ARCHITECTURE = "KunlunBaizeMTPModel"
MODEL_TYPE = "kunlunbaize"


def register() -> None:
    """Register KunlunBaizeForCausalLM and its MTP draft (lazily, by module path) unless vLLM already knows them,
    and install the ``mtp`` routing (:func:`route_mtp_draft`)."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    if ARCHITECTURE not in known:
        ModelRegistry.register_model(ARCHITECTURE, "kunlunbaize.vllm.model:KunlunBaizeForCausalLM")
    if MTP_ARCHITECTURE not in known:
        ModelRegistry.register_model(MTP_ARCHITECTURE, "kunlunbaize.vllm.mtp:KunlunBaizeMTP")
    route_mtp_draft()


def route_mtp_draft() -> None:
    """Patch ``SpeculativeConfig.hf_config_override`` so that a KunlunBaize config becomes the ``mtp`` draft's.

    vLLM (0.32) has no public hook for an out-of-tree model's MTP draft: with ``method="mtp"`` it makes the draft's
    config from the target's through ``SpeculativeConfig.hf_config_override``, a hard-coded chain of model types,
    and refuses a draft whose ``model_type`` is not one of its ``MTPModelTypes``. The wrapper installed here handles
    ``model_type == "kunlunbaize"`` first (everything else goes to vLLM's own chain unchanged): it sets the
    architecture to ``KunlunBaizeMTPModel``, ``n_predict`` to the export's MTP depth count and ``model_type`` to
    vLLM's generic ``"mtp"``. Idempotent; plugins load in every vLLM process before any config is made."""
    from vllm.config.speculative import SpeculativeConfig

    if getattr(SpeculativeConfig.hf_config_override, "kunlunbaize", False):
        return
    SpeculativeConfig.hf_config_override = staticmethod(_override(SpeculativeConfig.hf_config_override))


def _override(vllm_override):
    @functools.wraps(vllm_override)
    def hf_config_override(hf_config: Any) -> Any:
        if getattr(hf_config, "model_type", None) != MODEL_TYPE:
            return vllm_override(hf_config)
        if hf_config.mtp_depth < 1:
            raise ValueError("speculative method 'mtp' needs MTP depths, and this KunlunBaize export has none "
                             "(mtp_depth=0): serve it without speculative_config, or use method 'ngram'")
        hf_config.model_type = "mtp"
        hf_config.update({"n_predict": hf_config.mtp_depth, "architectures": [MTP_ARCHITECTURE]})
        return hf_config

    hf_config_override.kunlunbaize = True  # type: ignore[attr-defined]
    return hf_config_override


def start_draft_rounds() -> None:
    """Patch vLLM's speculative proposer to tell a KunlunBaize draft where each proposal starts.

    vLLM's generic ``mtp`` proposer (``SpecDecodeBaseProposer``) calls the draft model once per draft step without
    saying which step it is (only its Step-3.5 proposer passes ``spec_step_idx``), while KunlunBaize's depth j
    drafts step j. The wrapper installed here on ``build_model_inputs_first_pass`` — called once at the start of
    every proposal, for its first pass — calls the draft's :meth:`~.mtp.KunlunBaizeMTP.start_round`, which restarts
    its step counter. Idempotent; called when a KunlunBaize draft is built, so other models never see it."""
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    original = SpecDecodeBaseProposer.build_model_inputs_first_pass
    if getattr(original, "kunlunbaize", False):
        return

    @functools.wraps(original)
    def build_model_inputs_first_pass(self, *args, **kwargs):
        model = getattr(self, "model", None)
        model = model.unwrap() if hasattr(model, "unwrap") else model
        if hasattr(model, "start_round"):
            model.start_round()
        return original(self, *args, **kwargs)

    build_model_inputs_first_pass.kunlunbaize = True  # type: ignore[attr-defined]
    SpecDecodeBaseProposer.build_model_inputs_first_pass = build_model_inputs_first_pass
