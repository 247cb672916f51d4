"""TD3 updates on static buffers, captured as CUDA graphs (``td3.update_mode=cudagraphs``).

A CUDA graph replays the kernels it recorded on the memory it recorded them
on. So an update becomes a pure function of static buffers: each update copies
its batch and its target-policy noise into the same input tensors, then
replays. Two graphs cover TD3's delayed actor: a critic update, and a critic
update followed by the actor update and the targets' soft update; the host
picks one per update from the update count, as eager does.

What makes the captured step replayable:

- Adam is capturable and fused: its step count lives on the device, its
  bias corrections are computed there, and nothing reads a value back to the
  host inside the step.
- The noise is not drawn inside the graph: it is drawn before the updates,
  from each agent's own generator, one ``(B, A)`` draw per update as eager
  draws it (:meth:`TD3Ensemble._noise`), and copied in like the batch.
- Gradients are set to None and re-created by each backward inside the
  graph: they live in the graph's own memory pool.
- Capture follows a warm-up on a side stream (Adam creates its moments,
  autograd and the allocator settle). The warm-up trains on whatever the
  buffers hold, so every weight, moment and step count is put back in place
  afterwards: capturing changes no number.
- Losses stay on the device, one row per update, and come back to the host
  once per :meth:`StaticUpdate.train` call.

Without capture (``capture=False``, any device) the same step function runs
op by op on the same static buffers with the same optimizers: what a CPU can
test against eager.
"""

from __future__ import annotations

import torch


class StaticUpdate:
    """The cudagraphs update path of one :class:`dqd_ray.roles.td3.TD3Ensemble`.

    Args:
        ens: The ensemble (its optimizers built capturable).
        capture: Capture and replay CUDA graphs; False runs the step un-captured.
        warmup: Warm-up runs of each step before capture.
    """

    def __init__(self, ens, capture: bool = True, warmup: int = 3):
        self.ens, self.capture, self.warmup = ens, capture, warmup
        self.bufs: dict | None = None
        self.graphs: dict | None = None  # actor_step -> CUDAGraph
        self.outputs: dict = {}  # actor_step -> (critic losses, actor losses) the graph writes
        self._objectives = torch.as_tensor(ens.objectives, device=ens.device)

    def invalidate(self) -> None:
        """Drops the graphs (e.g. the optimizers were loaded with new tensors)."""
        self.graphs, self.outputs = None, {}

    def _allocate(self, b: int) -> None:
        ens, dev = self.ens, self.ens.device
        e, o, a = ens.num_agents, ens.spec.obs_dim, ens.spec.act_dim
        self.bufs = {
            "obs": torch.zeros(b, o, device=dev), "action": torch.zeros(b, a, device=dev),
            "next_obs": torch.zeros(b, o, device=dev), "reward": torch.zeros(e, b, device=dev),
            "not_done": torch.ones(1, b, device=dev),
            "noise": torch.zeros(e, b, a, device=dev) if ens.cfg.target_noise > 0 else None,
        }
        self.invalidate()

    def step(self, actor_step: bool):
        """One update on the static buffers: what a graph captures."""
        b = self.bufs
        return self.ens._update_eager(b["obs"], b["action"], b["next_obs"], b["reward"],
                                      b["not_done"], b["noise"], actor_step)

    def train(self, dev: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Updates on batches already on the device (arrays ``(n, B, ...)``).

        Returns:
            Critic losses ``(n, E)`` and actor losses ``(actor steps, E)``, on the device.
        """
        ens = self.ens
        n, b = dev["obs"].shape[:2]
        if self.bufs is None or self.bufs["obs"].shape[0] != b:
            self._allocate(b)
        # Every update's inputs at once, as eager computes them one at a time.
        rewards = dev["reward"].index_select(2, self._objectives).transpose(1, 2)  # (n, E, B)
        not_done = 1.0 - dev["terminated"].unsqueeze(1)  # (n, 1, B)
        noise = ens._noise(n, b)
        delay, first = ens.cfg.policy_delay, ens.updates + 1
        n_actor = sum(1 for u in range(first, first + n) if u % delay == 0)
        critic = torch.empty(n, ens.num_agents, device=ens.device)
        actor = torch.empty(n_actor, ens.num_agents, device=ens.device)
        if self.capture and self.graphs is None:
            self._capture()
        k = 0
        for i in range(n):
            bufs = self.bufs
            bufs["obs"].copy_(dev["obs"][i])
            bufs["action"].copy_(dev["action"][i])
            bufs["next_obs"].copy_(dev["next_obs"][i])
            bufs["reward"].copy_(rewards[i])
            bufs["not_done"].copy_(not_done[i])
            if noise is not None:
                bufs["noise"].copy_(noise[i])
            actor_step = ens._next_is_actor_step()
            if self.capture:
                self.graphs[actor_step].replay()
                c, a = self.outputs[actor_step]
            else:
                c, a = self.step(actor_step)
            critic[i].copy_(c)
            if actor_step:
                actor[k].copy_(a)
                k += 1
        return critic, actor

    # -- capture ---------------------------------------------------------------

    def _snapshot(self) -> tuple[list, list]:
        """Copies of every tensor an update changes in place: weights, targets,
        and per optimizer, per parameter, its Adam state (none yet: absent)."""
        ens = self.ens
        params = [p.data.clone() for net in self._nets() for p in net.parameters()]
        opts = [{p: {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
                 for p, st in opt.state.items()} for opt in (ens.actor_opt, ens.critic_opt)]
        return params, opts

    def _restore(self, snapshot: tuple[list, list]) -> None:
        """Puts a snapshot back in place (the tensors keep their memory); Adam
        state created since is reset to its fresh value, zeros."""
        ens = self.ens
        params, opts = snapshot
        with torch.no_grad():
            for p, v in zip((p for net in self._nets() for p in net.parameters()), params):
                p.copy_(v)
            for opt, saved in zip((ens.actor_opt, ens.critic_opt), opts):
                for p, st in opt.state.items():
                    for k, v in st.items():
                        if not isinstance(v, torch.Tensor):
                            continue
                        if p in saved:
                            v.copy_(saved[p][k])
                        else:
                            v.zero_()

    def _nets(self):
        ens = self.ens
        return ens.actor, ens.critic, ens.actor_target, ens.critic_target

    def warm_up(self) -> None:
        """Runs both steps ``warmup`` times on the buffers as they are, then puts
        every weight and Adam state back: no number changes."""
        snapshot = self._snapshot()
        for _ in range(self.warmup):
            for actor_step in (False, True):
                self.step(actor_step)
        self._restore(snapshot)

    def _capture(self) -> None:
        dev = self.ens.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self.warm_up()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graphs, self.outputs = {}, {}
        for actor_step in (False, True):
            graph = torch.cuda.CUDAGraph()
            # thread_local: the learner's other threads may use CUDA meanwhile.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs[actor_step] = self.step(actor_step)
            self.graphs[actor_step] = graph
