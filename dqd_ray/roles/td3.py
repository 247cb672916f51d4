"""An ensemble of k+1 TD3 agents (fitness, measure 1..k) trained as one.

Every agent is an actor with twin critics and target copies. All agents'
weights are stacked along a leading model axis and evaluated with batched
matmuls, so one optimizer step updates every agent; agent j learns from the
j-th reward column of the shared batches. Agents never share parameters, and
Adam acts elementwise, so the ensemble is exactly k+1 independent TD3 agents.

``jacobian`` returns d/dtheta mean_s Q_j(s, pi_theta(s)) for every objective j
and every genome theta, uphill: one backward pass through the critics to
their action inputs, then batched vector-jacobian products through the policy.

Each agent's initial weights and target-smoothing noise come from its own
random stream, seeded by (seed, objective): an ensemble of all objectives and
several ensembles splitting them between learners hold the same agents, so
the split is a placement choice that changes no number.

One update is one function of its inputs (batch, noise, whether the delayed
actor steps), :meth:`TD3Ensemble._update_eager`, run as is (``td3.update_mode``
eager), through ``torch.compile`` (compile), or on static buffers captured as
CUDA graphs (cudagraphs, see :mod:`dqd_ray.roles.td3_graphs`). The noise is
drawn outside it, from the agents' own streams, in the same order in every
mode.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from dqd_ray.roles.policy import PolicySpec


def update_mode(cfg) -> str:
    """``td3.update_mode``, with the older ``td3.compile=true`` read as compile."""
    mode = getattr(cfg, "update_mode", "eager")
    return "compile" if mode == "eager" and getattr(cfg, "compile", False) else mode


def agent_seeds(seed: int, objective: int) -> tuple[int, int]:
    """(initialization seed, noise seed) of the agent learning ``objective``."""
    init, noise = np.random.SeedSequence([int(seed), int(objective)]).generate_state(2)
    return int(init), int(noise)


class StackedMLP(torch.nn.Module):
    """``n`` independent MLPs evaluated together: input ``(n, B, in)``.

    Weights are stored as ``(n, in, out)``; ``init`` is ``"torch"`` (PyTorch's
    Linear default) or ``"xavier"`` (Xavier uniform, zero bias). Model ``i``
    draws its initial weights from ``generators[i]`` only.
    """

    def __init__(self, n: int, sizes: list[int], hidden: str, out: str | None,
                 init: str, generators: list[torch.Generator]):
        super().__init__()
        if len(generators) != n:
            raise ValueError(f"need one generator per model: {n} models, {len(generators)} given")
        self.n, self.sizes, self.hidden, self.out = n, list(sizes), hidden, out
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for fi, fo in zip(sizes[:-1], sizes[1:]):
            ws, bs = [], []
            for gen in generators:
                if init == "xavier":
                    bound = math.sqrt(6.0 / (fi + fo))
                    ws.append((torch.rand(fi, fo, generator=gen) * 2 - 1) * bound)
                    bs.append(torch.zeros(1, fo))
                else:
                    bound = 1.0 / math.sqrt(fi)
                    ws.append((torch.rand(fi, fo, generator=gen) * 2 - 1) * bound)
                    bs.append((torch.rand(1, fo, generator=gen) * 2 - 1) * bound)
            self.weights.append(torch.nn.Parameter(torch.stack(ws)))
            self.biases.append(torch.nn.Parameter(torch.stack(bs)))

    @staticmethod
    def _act(x, name):
        if name == "relu":
            return torch.relu(x)
        if name == "tanh":
            return torch.tanh(x)
        return x

    def forward(self, x: torch.Tensor, select: slice | None = None) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if select is not None:
                w, b = w[select], b[select]
            x = torch.baddbmm(b, x, w)
            x = self._act(x, self.out if i == last else self.hidden)
        return x


class TD3Ensemble:
    """k+1 TD3 agents, one per objective.

    Args:
        policy_spec: Actor architecture (the fitness actor is a policy genome).
        num_objectives: 1 + number of measures.
        cfg: A :class:`dqd_ray.config.TD3Config`.
        device: ``"cpu"`` or ``"cuda"``.
        seed: Root seed; agent j's initialization and noise are seeded by
            ``(seed, objective j)``.
        objectives: Which objectives (indices into the reward vector) these
            agents learn; default all. A learner owning a subset passes its own.
        capture: With ``update_mode=cudagraphs``, capture and replay CUDA
            graphs (needs CUDA). False runs the same static-buffer update
            un-captured, on any device: what tests compare with eager on a CPU.

    Raises:
        RuntimeError: ``update_mode=cudagraphs`` on a device other than CUDA.
    """

    def __init__(self, policy_spec: PolicySpec, num_objectives: int, cfg, *,
                 device: str = "cpu", seed: int = 0, objectives: list[int] | None = None,
                 capture: bool = True):
        self.spec, self.cfg = policy_spec, cfg
        self.device = torch.device(device)
        self.mode = update_mode(cfg)
        if self.mode == "cudagraphs" and capture and self.device.type != "cuda":
            raise RuntimeError(
                f"td3.update_mode=cudagraphs needs a CUDA GPU, but this learner runs on "
                f"{self.device.type}: give learners a GPU torch can see "
                "(resources.num_gpus_per_learner > 0, and resources.strict_gpu=true to fail "
                "early when none is found), or set td3.update_mode=eager (or compile)")
        self.objectives = (list(range(num_objectives)) if objectives is None
                           else [int(o) for o in objectives])
        e = len(self.objectives)
        self.num_agents = e
        init_seeds, noise_seeds = zip(*(agent_seeds(seed, o) for o in self.objectives))
        gens = [torch.Generator().manual_seed(s) for s in init_seeds]
        obs_dim, act_dim = policy_spec.obs_dim, policy_spec.act_dim
        hidden_act = policy_spec.activation
        self.actor = StackedMLP(e, policy_spec.sizes, hidden_act, "tanh", "xavier", gens)
        critic_sizes = [obs_dim + act_dim, *cfg.critic_hidden_sizes, 1]
        # Critic model 2j is agent j's Q1, model 2j+1 its Q2.
        twin_gens = [g for g in gens for _ in range(2)]
        self.critic = StackedMLP(2 * e, critic_sizes, "relu", None, "torch", twin_gens)
        self.actor.to(self.device)
        self.critic.to(self.device)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        for p in (*self.actor_target.parameters(), *self.critic_target.parameters()):
            p.requires_grad_(False)
        # A graph replays its optimizer steps: Adam keeps its step count on the
        # device and reads it there (capturable; fused: one kernel per step, and
        # the one capturable Adam that also runs on a CPU).
        opt_kw = {"capturable": True, "fused": True} if self.mode == "cudagraphs" else {}
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr, **opt_kw)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr, **opt_kw)
        self.noise_gens = [torch.Generator(device=self.device).manual_seed(s)
                           for s in noise_seeds]
        self.updates = 0
        self._update = self._update_eager
        if self.mode == "compile":
            self._update = torch.compile(self._update_eager, dynamic=False)
        self._static = None
        if self.mode == "cudagraphs":
            from dqd_ray.roles.td3_graphs import StaticUpdate

            self._static = StaticUpdate(self, capture=capture)

    # -- training ----------------------------------------------------------

    def _to(self, a) -> torch.Tensor:
        if isinstance(a, torch.Tensor):  # already moved (see to_device)
            return a.to(self.device, torch.float32)
        a = np.asarray(a, dtype=np.float32)
        if not a.flags.writeable:  # e.g. zero-copy arrays from Ray's object store
            a = a.copy()
        if self.device.type == "cuda":
            # Pinned host memory and an asynchronous copy: the host does not wait.
            return torch.from_numpy(a).pin_memory().to(self.device, non_blocking=True)
        return torch.as_tensor(a, device=self.device)

    def to_device(self, batches: dict) -> dict:
        """Moves sampled batches to this ensemble's device ahead of use, in one
        (asynchronous, on a GPU) copy per array; :meth:`train` takes the result."""
        return {k: self._to(v) for k, v in batches.items()}

    def _q(self, net: StackedMLP, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """obs/act ``(E, B, .)`` -> Q ``(E, 2, B)`` (both twins)."""
        e, b = obs.shape[0], obs.shape[1]
        x = torch.cat([obs, act], dim=-1)  # (E, B, in)
        x = x.unsqueeze(1).expand(e, 2, b, x.shape[-1]).reshape(2 * e, b, x.shape[-1])
        return net(x).reshape(e, 2, b)

    def train_step(self, batch: dict) -> dict:
        """One TD3 update of every agent on one batch (arrays ``(B, ...)``)."""
        out = self._train_step(batch)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def _batch_tensors(self, batch: dict):
        """obs, action, next obs ``(B, .)``, this ensemble's rewards ``(E, B)``
        and not-done ``(1, B)``, on the device."""
        obs = self._to(batch["obs"])
        act = self._to(batch["action"])
        nxt = self._to(batch["next_obs"])
        rew = self._to(batch["reward"])[:, self.objectives].T
        not_done = 1.0 - self._to(batch["terminated"]).unsqueeze(0)
        return obs, act, nxt, rew, not_done

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, .)`` -> ``(E, B, .)``: every agent sees the same batch (a view)."""
        return x.unsqueeze(0).expand(self.num_agents, -1, -1)

    def _noise(self, n: int, b: int) -> torch.Tensor | None:
        """The clipped target-policy smoothing noise of the next ``n`` updates of
        ``b`` transitions, ``(n, E, b, A)`` (None: no noise). Agent j's comes from
        its own stream, one draw of ``(b, A)`` per update: drawn for many updates
        at once or one update at a time, the numbers are the same."""
        cfg = self.cfg
        if cfg.target_noise <= 0:
            return None
        out = torch.empty(n, self.num_agents, b, self.spec.act_dim, device=self.device)
        for i in range(n):
            for j, gen in enumerate(self.noise_gens):
                torch.randn(out.shape[2:], generator=gen, device=self.device, out=out[i, j])
        return (out * cfg.target_noise).clamp(-cfg.noise_clip, cfg.noise_clip)

    def _next_is_actor_step(self) -> bool:
        """Counts one more update; whether the delayed actors step in it."""
        self.updates += 1
        return self.updates % self.cfg.policy_delay == 0

    def _train_step(self, batch: dict) -> dict:
        """One update; the losses stay on the device (no host synchronization)."""
        if self._static is not None:  # a call of one update
            one = {k: (v if isinstance(v, torch.Tensor) else np.asarray(v))[None]
                   for k, v in batch.items()}
            critic, actor = self._static.train(self.to_device(one))
            out = {"critic_loss": critic[0]}
            if len(actor):
                out["actor_loss"] = actor[0]
            return out
        obs, act, nxt, rew, not_done = self._batch_tensors(batch)
        noise = self._noise(1, obs.shape[0])
        actor_step = self._next_is_actor_step()
        critic, actor = self._update(obs, act, nxt, rew, not_done,
                                     None if noise is None else noise[0], actor_step)
        out = {"critic_loss": critic}
        if actor is not None:
            out["actor_loss"] = actor
        return out

    def _update_eager(self, obs, act, nxt, rew, not_done, noise, actor_step: bool):
        """One TD3 update of every agent: a critic step, then, if ``actor_step``,
        an actor step up Q1 and the targets' soft update.

        A function of its inputs and the weights and Adam moments only (no
        random draw, no host synchronization): the step a CUDA graph captures.
        ``obs``, ``act``, ``nxt`` are ``(B, .)``, ``rew`` ``(E, B)``,
        ``not_done`` ``(1, B)``, ``noise`` ``(E, B, A)`` or None. Returns the
        critic losses ``(E,)`` and the actor losses ``(E,)`` (None: no actor step).
        """
        obs, act, nxt = self._expand(obs), self._expand(act), self._expand(nxt)
        per_agent = self._critic_loss_eager(obs, act, nxt, rew, not_done, noise)  # (E,)
        self.critic_opt.zero_grad(set_to_none=True)
        per_agent.sum().backward()
        self.critic_opt.step()
        if not actor_step:
            return per_agent.detach(), None
        actor_agent = self._actor_loss_eager(obs)
        self.actor_opt.zero_grad(set_to_none=True)
        actor_agent.sum().backward()
        self.actor_opt.step()
        self._soft_update()
        return per_agent.detach(), actor_agent.detach()

    def _critic_loss_eager(self, obs, act, nxt, rew, not_done, noise) -> torch.Tensor:
        """Each agent's twin-critic TD loss ``(E,)``; ``noise`` is the clipped
        target-policy smoothing noise (None: none)."""
        with torch.no_grad():
            next_act = self.actor_target(nxt)
            if noise is not None:
                next_act = (next_act + noise).clamp(-1.0, 1.0)
            q_next = self._q(self.critic_target, nxt, next_act).min(dim=1).values  # (E, B)
            target = rew + self.cfg.gamma * not_done * q_next
        q = self._q(self.critic, obs, act)  # (E, 2, B)
        return ((q - target.unsqueeze(1)) ** 2).mean(dim=2).sum(dim=1)

    def _actor_loss_eager(self, obs) -> torch.Tensor:
        """Each agent's actor loss ``(E,)``: minus its Q1 at its own actions."""
        e = self.num_agents
        pi = self.actor(obs)
        x = torch.cat([obs, pi], dim=-1)
        q1 = self.critic(x, select=slice(0, 2 * e, 2)).squeeze(-1)  # (E, B)
        return -q1.mean(dim=1)

    @torch.no_grad()
    def td_loss(self, batch: dict) -> np.ndarray:
        """Each agent's twin-critic TD loss on one batch, without updating anything
        and without target-policy noise (no random stream is touched): a probe
        of the critics' weights, e.g. before a failure and after a restore."""
        obs, act, nxt, rew, not_done = self._batch_tensors(batch)
        return self._critic_loss_eager(self._expand(obs), self._expand(act), self._expand(nxt),
                                       rew, not_done, None).cpu().numpy()

    @torch.no_grad()
    def _soft_update(self) -> None:
        tau = self.cfg.tau
        for net, tgt in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            for p, tp in zip(net.parameters(), tgt.parameters()):
                tp.lerp_(p, tau)

    def train(self, batches: dict) -> dict:
        """One update per batch; ``batches`` arrays are ``(num_batches, B, ...)``.

        Returns mean losses per agent (``critic_loss``, ``actor_loss``) and the
        number of updates done.
        """
        n = len(batches["obs"])
        dev = self.to_device(batches)  # one copy per array, not one per update
        if self._static is not None:  # losses in two device arrays
            critic, actor = self._static.train(dev)
        else:
            critic, actor = [], []
            for i in range(n):
                out = self._train_step({k: v[i] for k, v in dev.items()})
                critic.append(out["critic_loss"])
                if "actor_loss" in out:
                    actor.append(out["actor_loss"])
            critic = torch.stack(critic) if critic else []
            actor = torch.stack(actor) if actor else []
        # One device-to-host copy for all the losses.
        critic = list(critic.cpu().numpy()) if len(critic) else []
        actor = list(actor.cpu().numpy()) if len(actor) else []
        return {
            "critic_loss": np.mean(critic, axis=0) if critic else np.full(self.num_agents, np.nan),
            "actor_loss": np.mean(actor, axis=0) if actor else np.full(self.num_agents, np.nan),
            "updates": n,
        }

    # -- gradients ---------------------------------------------------------

    def jacobian(self, genomes: np.ndarray, states: np.ndarray,
                 chunk_rows: int = 16384) -> np.ndarray:
        """Gradients of mean_s Q_j(s, pi_theta(s)) w.r.t. each genome theta.

        By the chain rule the gradient is mean_s dQ_j/da(s, pi(s)) . dpi/dtheta:
        one backward pass through all critics (to their action inputs only:
        each agent's Q depends on its own copy of the action, so one pass gives
        every dQ_j/da), then one vector-jacobian product per objective through
        the small policy network (batched). States are processed in chunks of
        ``chunk_rows`` genome-state pairs to bound memory.

        Args:
            genomes: ``(G, D)`` policy genomes.
            states: ``(S, obs)`` states (e.g. sampled from the replay buffer).
            chunk_rows: Genome-state pairs per chunk.

        Returns:
            ``(G, E, D)`` float64, row j the uphill gradient of agent j's Q1.
        """
        genomes = self.spec.check(genomes)
        g_count, e = genomes.shape[0], self.num_agents
        theta = self._to(genomes).requires_grad_(True)
        s_all = self._to(states)
        n_total = s_all.shape[0]
        step = max(1, chunk_rows // g_count)
        total = torch.zeros(e, g_count, genomes.shape[1], device=self.device)
        for lo in range(0, n_total, step):
            s = s_all[lo:lo + step]
            n_s = s.shape[0]
            act = self.spec.forward_torch(theta, s)  # (G, S, A), graph to theta
            a = act.detach().unsqueeze(0).expand(e, -1, -1, -1).contiguous().requires_grad_(True)
            obs_e = s.unsqueeze(0).unsqueeze(0).expand(e, g_count, n_s, s.shape[-1])
            x = torch.cat([obs_e, a], dim=-1).reshape(e, g_count * n_s, -1)
            q1 = self.critic(x, select=slice(0, 2 * e, 2))
            (dq_da,) = torch.autograd.grad(q1.sum(), a)  # (E, G, S, A)
            (grads,) = torch.autograd.grad(act, theta, grad_outputs=dq_da / n_total,
                                           is_grads_batched=True)  # (E, G, D)
            total += grads
        return total.permute(1, 0, 2).detach().cpu().double().numpy()

    def pg_variation(self, genomes: np.ndarray, states: np.ndarray, lr: float,
                     agent: int = 0) -> np.ndarray:
        """PGA-ME's policy-gradient variation: Adam steps up ``agent``'s Q1.

        Each genome is its own actor with its own Adam moments (Adam is
        elementwise and each genome's loss depends on its own weights only, so
        one batched optimizer over the stacked genomes is exactly that).

        Args:
            genomes: ``(G, D)`` parents.
            states: ``(steps, G, S, obs)``: fresh states for every step and genome.
            lr: Adam learning rate.
            agent: Which agent's critic (0 = fitness).

        Returns:
            ``(G, D)`` float32 variants.
        """
        genomes = self.spec.check(genomes)
        theta = self._to(genomes).clone().requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=lr)
        q1_model = slice(2 * agent, 2 * agent + 1)
        for step_states in states:
            s = self._to(step_states)  # (G, S, obs)
            act = self.spec.forward_torch(theta, s)  # (G, S, A)
            x = torch.cat([s, act], dim=-1).reshape(1, -1, s.shape[-1] + act.shape[-1])
            q1 = self.critic(x, select=q1_model).reshape(s.shape[0], s.shape[1])
            loss = -q1.mean(dim=1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return theta.detach().cpu().numpy().astype(np.float32)

    def greedy_genome(self, agent: int = 0) -> np.ndarray:
        """The actor of ``agent`` (0 = fitness) as a flat policy genome."""
        layers = []
        for w, b in zip(self.actor.weights, self.actor.biases):
            layers.append((w[agent].detach().cpu().numpy().T, b[agent, 0].detach().cpu().numpy()))
        return self.spec.flatten(layers)

    # -- state ---------------------------------------------------------------

    def state_dict(self) -> dict:
        """A snapshot: later training does not change the returned tensors.

        (torch's ``state_dict`` methods return live references to the weights
        and Adam moments, which every update changes in place.)
        """
        return copy.deepcopy({
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
            "noise_gens": [g.get_state() for g in self.noise_gens], "updates": self.updates,
            "objectives": list(self.objectives),
        })

    def load_state_dict(self, state: dict) -> None:
        if list(state["objectives"]) != self.objectives:
            raise ValueError(f"state is for objectives {state['objectives']}, "
                             f"this ensemble has {self.objectives}")
        # Optimizer.load_state_dict keeps the given moment/step tensors as its
        # own state (no copy): copy them so this ensemble never shares them
        # with the state's source or with another ensemble loaded from it.
        state = {**state, "actor_opt": copy.deepcopy(state["actor_opt"]),
                 "critic_opt": copy.deepcopy(state["critic_opt"])}
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        # The configured rate wins over the saved one: a restore under a new
        # config (a Tune PBT exploit) must train at the new rate.
        for opt in (self.actor_opt, self.critic_opt):
            for group in opt.param_groups:
                group["lr"] = self.cfg.lr
        if len(state["noise_gens"]) != len(self.noise_gens):
            raise ValueError(f"state has {len(state['noise_gens'])} noise streams, "
                             f"this ensemble has {len(self.noise_gens)}")
        for g, st in zip(self.noise_gens, state["noise_gens"]):
            g.set_state(st.cpu() if hasattr(st, "cpu") else st)
        self.updates = int(state["updates"])
        if self._static is not None:  # the optimizers hold new moment tensors
            self._static.invalidate()
