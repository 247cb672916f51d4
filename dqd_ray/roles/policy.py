"""MLP policies as flat float32 genomes, with numpy and torch forwards.

Genome layout: for each layer in order, the weight matrix of shape
``(out, in)`` row-major, then the bias ``(out,)``. Hidden and output layers
use the activation (tanh by default; the output is always tanh so actions stay
in [-1, 1]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only for the learner's forward: rollout workers start faster
    import torch


class PolicySpec:
    """Shape of an MLP policy and conversions between genome and layers.

    Args:
        obs_dim: Observation size.
        act_dim: Action size.
        hidden_sizes: Hidden widths.
        activation: ``"tanh"`` or ``"relu"`` for hidden layers.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes=(128, 128),
                 activation: str = "tanh"):
        if activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.sizes = [self.obs_dim, *map(int, hidden_sizes), self.act_dim]
        self.activation = activation
        self.layers: list[tuple[slice, slice, int, int]] = []
        pos = 0
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            w = slice(pos, pos + fan_in * fan_out)
            pos += fan_in * fan_out
            b = slice(pos, pos + fan_out)
            pos += fan_out
            self.layers.append((w, b, fan_in, fan_out))
        self.genome_dim = pos

    @classmethod
    def from_config(cls, env_id: str, policy_cfg) -> "PolicySpec":
        from dqd_ray.envs import env_metadata

        meta = env_metadata(env_id)
        return cls(meta.obs_dim, meta.act_dim, policy_cfg.hidden_sizes, policy_cfg.activation)

    # -- genome <-> layers -------------------------------------------------

    def init_genome(self, rng: np.random.Generator) -> np.ndarray:
        """Xavier-uniform weights, zero biases."""
        g = np.zeros(self.genome_dim, np.float32)
        for w, _, fan_in, fan_out in self.layers:
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            g[w] = rng.uniform(-bound, bound, fan_in * fan_out)
        return g

    def unflatten(self, genome: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        genome = self.check(genome)
        return [(genome[w].reshape(fo, fi), genome[b]) for w, b, fi, fo in self.layers]

    def flatten(self, layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        if len(layers) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} layers, got {len(layers)}")
        g = np.empty(self.genome_dim, np.float32)
        for (w, b, fi, fo), (W, B) in zip(self.layers, layers):
            if np.shape(W) != (fo, fi) or np.shape(B) != (fo,):
                raise ValueError(f"layer shapes {np.shape(W)}, {np.shape(B)}; "
                                 f"expected ({fo}, {fi})")
            g[w] = np.asarray(W).ravel()
            g[b] = B
        return g

    def check(self, genome: np.ndarray) -> np.ndarray:
        genome = np.asarray(genome)
        if genome.shape[-1] != self.genome_dim:
            raise ValueError(
                f"genome has {genome.shape[-1]} parameters; this policy needs {self.genome_dim}"
            )
        return genome

    # -- forwards ----------------------------------------------------------

    def _act_np(self, x: np.ndarray, last: bool) -> np.ndarray:
        if last or self.activation == "tanh":
            return np.tanh(x, out=x)
        return np.maximum(x, 0.0, out=x)

    def forward_np(self, genome: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """One genome, a batch of observations ``(B, obs)`` -> ``(B, act)``."""
        genome = self.check(genome)
        x = np.asarray(obs, np.float32)
        n = len(self.layers)
        for i, (w, b, fi, fo) in enumerate(self.layers):
            x = x @ genome[w].reshape(fo, fi).T + genome[b]
            x = self._act_np(x, i == n - 1)
        return x

    def forward_many_np(self, genomes: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """Many genomes ``(G, D)``, observations ``(G, B, obs)`` or ``(G, obs)``."""
        genomes = self.check(genomes)
        x = np.asarray(obs, np.float32)
        squeeze = x.ndim == 2
        if squeeze:
            x = x[:, None, :]
        g = genomes.shape[0]
        n = len(self.layers)
        for i, (w, b, fi, fo) in enumerate(self.layers):
            W = genomes[:, w].reshape(g, fo, fi)
            x = np.matmul(x, W.transpose(0, 2, 1)) + genomes[:, None, b]
            x = self._act_np(x, i == n - 1)
        return x[:, 0] if squeeze else x

    def forward_torch(self, genomes: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Differentiable forward: genomes ``(G, D)``, obs ``(S, obs)`` or ``(G, S, obs)``.

        Returns ``(G, S, act)``; gradients flow to the flat genomes.
        """
        import torch

        g = genomes.shape[0]
        x = obs if obs.dim() == 3 else obs.unsqueeze(0).expand(g, -1, -1)
        n = len(self.layers)
        for i, (w, b, fi, fo) in enumerate(self.layers):
            W = genomes[:, w].reshape(g, fo, fi)
            x = torch.baddbmm(genomes[:, b].unsqueeze(1), x, W.transpose(1, 2))
            x = torch.tanh(x) if (i == n - 1 or self.activation == "tanh") else torch.relu(x)
        return x
