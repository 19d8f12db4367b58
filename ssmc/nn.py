"""PyTorch modules over compiled SSM kernels: ``ssmc.nn.SSMLayer(spec, d_model)`` and
``ssmc.nn.Model(model_spec)``; they live in ``ssmc.runtime`` (see docs/runtime.md).

    layer = ssmc.nn.SSMLayer("examples/mamba2.ssm", d_model=2560, target="cuda")
    model = ssmc.nn.Model("examples/jamba.ssm", target="cuda")
    state = model.allocate_state(batch=1)
    logits = model(prompt, state)                 # prefill
    logits = model.step(next_tokens, state)       # one token per sequence
"""
from ssmc.runtime.models import Attention, MLP, Model, ModelState, MoE
from ssmc.runtime.modules import RMSNorm, SSMLayer, SSMState

__all__ = ["SSMLayer", "SSMState", "Model", "ModelState", "Attention", "MLP", "MoE", "RMSNorm"]
