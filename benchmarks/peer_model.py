"""The plain-PyTorch peer of bench_gpu.py: a GPT of the same shape and step, no Megatron (see FACTS "One GPU").

Pre-LayerNorm blocks, RoPE, GELU MLP, untied output head, attention by F.scaled_dot_product_attention
(is_causal=True), bf16 weights, AdamW (fused on CUDA), eager mode, microbatches with gradient accumulation.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of [b, heads, s, d] (rotate-half convention)."""
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, device=x.device, dtype=torch.float32), inv)
    cos, sin = torch.cat([angles, angles], -1).cos().to(x.dtype), torch.cat([angles, angles], -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, h: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class PeerGPT(nn.Module):
    def __init__(self, *, layers: int, hidden: int, heads: int, ffn: int, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens, labels, loss_mask):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)).float()
        losses = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return (losses * loss_mask.reshape(-1)).sum(), loss_mask.sum()


def build(cfg, *, vocab: int, device) -> tuple[nn.Module, torch.optim.Optimizer]:
    m = cfg.model
    model = PeerGPT(layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads, ffn=m.ffn_hidden_size,
                    vocab=vocab).to(device=device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                            weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")
    return model, opt


def step(model, opt, microbatches: list[dict], device) -> float:
    """One optimizer step: per-token loss over all microbatches, gradient clipping at 1.0 as the project does."""
    opt.zero_grad(set_to_none=True)
    total = sum(float(mb["loss_mask"].sum()) for mb in microbatches)
    for mb in microbatches:
        loss, _ = model(mb["tokens"].to(device), mb["labels"].to(device), mb["loss_mask"].to(device))
        (loss / total).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return total
