"""A real PEFT LoRA model on a tiny transformers Llama built from a config (no hub download).

The same seeds build the same base weights and the same adapters in one process (the float64
reference) and on every rank, however the ranks shard it:

* :func:`adapters_sharded`: ``get_peft_model`` first, then ``fully_shard`` (adapters are DTensors);
* :func:`adapters_plain`: ``fully_shard`` first, then ``get_peft_model`` (PEFT on a model sharded at
  load time, as transformers' ``from_pretrained(distributed_config=...)`` does): the adapters stay plain
  tensors beside the DTensor base weights; with ``train_norms`` the RMSNorm weights train too (DTensors).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, SEQ, BATCH = 32, 8, 2
LLAMA = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
            init_lora_weights=False)  # B random (not zero), so that A has a gradient at the first step


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA))


def add_lora(model: nn.Module, train_norms: bool) -> nn.Module:
    """PEFT LoRA on q/v projections (seeded); optionally the RMSNorm weights trainable too."""
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(**LORA))
    if train_norms:
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.requires_grad_(True)
    return model


def reference_model(train_norms: bool, dtype: torch.dtype = torch.float64) -> nn.Module:
    return add_lora(base_model(), train_norms).to(dtype)


def shard(model: LlamaForCausalLM, mesh: object) -> None:
    """``fully_shard`` each decoder layer, then the root (torchtitan's / transformers' FSDP2 plan)."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def adapters_sharded(mesh: object) -> nn.Module:
    model = add_lora(base_model(), train_norms=False)
    shard(model.base_model.model, mesh)
    return model


def adapters_plain(mesh: object, train_norms: bool) -> nn.Module:
    base = base_model()
    shard(base, mesh)
    return add_lora(base, train_norms)


def tokens(step: int, replica: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + replica)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def global_tokens(step: int, replicas: int) -> torch.Tensor:
    return torch.cat([tokens(step, r) for r in range(replicas)])


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The causal LM loss (mean over the shifted tokens): every row has as many, so the mean over all ranks'
    rows is the mean of the ranks' means."""
    return model(input_ids=ids, labels=ids).loss
