"""A small torch implementation of the llama2.c model (the stories260K checkpoint), for the Collector
tests: format in ../shared/models/stories260k/README.md (examples/llama2c/model.cpp reads the same).
GQA attention with interleaved RoPE (theta 10000), RMSNorm (eps 1e-5), SwiGLU, tied classifier.
The final RMSNorm is the module `norm`; model(input_ids) returns the logits [B, T, V]."""
import numpy as np
import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


class Llama2c(nn.Module):
    def __init__(self, path):
        super().__init__()
        raw = np.fromfile(path, dtype=np.uint8)
        dim, hidden, L, nh, nkv, vocab, seq_len = (int(v) for v in raw[:28].view(np.int32))
        self.dim, self.L, self.nh, self.nkv, self.vocab = dim, L, nh, nkv, abs(vocab)
        hs = dim // nh
        kv = nkv * hs
        w = raw[28:].view(np.float32)
        pos = 0

        def take(*shape):
            nonlocal pos
            n = int(np.prod(shape))
            t = torch.from_numpy(w[pos:pos + n].reshape(shape).copy())
            pos += n
            return t

        V = self.vocab
        self.tok = take(V, dim)
        rms_att, wq, wk, wv, wo = take(L, dim), take(L, dim, dim), take(L, kv, dim), take(L, kv, dim), take(L, dim, dim)
        rms_ffn, w1, w2, w3 = take(L, dim), take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
        self.norm = RMSNorm(take(dim))
        self.output = nn.Linear(dim, V, bias=False)
        self.output.weight = nn.Parameter(self.tok, requires_grad=False)  # tied
        self.layers = [dict(att=rms_att[l], wq=wq[l], wk=wk[l], wv=wv[l], wo=wo[l], ffn=rms_ffn[l], w1=w1[l], w2=w2[l],
                            w3=w3[l]) for l in range(L)]
        # Interleaved RoPE: pair (2i, 2i+1) of each head rotates by pos / 10000^(2i / head_size).
        freq = 1.0 / (10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
        self.register_buffer("freq", freq, persistent=False)
        self.hs = hs

    @staticmethod
    def _rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def _rope(self, x, T):
        # x [B, T, heads, hs]
        ang = torch.arange(T, dtype=torch.float32)[:, None] * self.freq[None, :]  # [T, hs/2]
        c, s = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        x = self.tok[input_ids.long()]
        causal = torch.full((T, T), float("-inf")).triu(1)
        rep = self.nh // self.nkv
        for p in self.layers:
            h = self._rms(x, p["att"])
            q = self._rope((h @ p["wq"].T).view(B, T, self.nh, self.hs), T)
            k = self._rope((h @ p["wk"].T).view(B, T, self.nkv, self.hs), T)
            v = (h @ p["wv"].T).view(B, T, self.nkv, self.hs)
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
            att = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.hs ** 0.5 + causal
            o = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(B, T, self.dim)
            x = x + o @ p["wo"].T
            h = self._rms(x, p["ffn"])
            x = x + (torch.nn.functional.silu(h @ p["w1"].T) * (h @ p["w3"].T)) @ p["w2"].T
        return self.output(self.norm(x))
