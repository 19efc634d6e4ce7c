"""The checkpoint's tensors as vLLM should see them after pruning.

Pruned experts' tensors are skipped by name, before they are read; kept
experts are renumbered 0..K-1 in ascending order of their old ids; fused
all-expert tensors and router tensors are sliced to the kept rows. This is the
same place in the pipeline where vLLM's EP weight filter skips non-local experts,
and that filter is applied afterwards in the new id space.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from vllm_aimer.checkpoint import Checkpoint
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout
from vllm_aimer.plan import Plan

__all__ = ["LoadStats", "PlanMap", "PrunedWeights"]


@dataclass
class LoadStats:
    """What an iteration of `PrunedWeights` read and skipped, updated as it goes."""
    expert_bytes_loaded: int = 0
    """Bytes of kept experts' tensors read (fused tensors: their kept rows' share)."""
    expert_bytes_skipped: int = 0
    """Bytes of pruned experts' tensors never read."""
    tensors_read: set[str] = field(default_factory=set)
    """Checkpoint names of every tensor read from disk (whole or in part)."""


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) runs of ascending ids, to read fused tensors in few slices."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class PlanMap:
    """How a plan changes each checkpoint tensor name, in the checkpoint's numbering:
    a pruned expert's tensor is dropped, a kept one renamed to its new id, a fused
    all-experts or router tensor sliced to the kept rows, anything else untouched.

    Args:
        layout: the checkpoint's expert layout (names, expert count, MTP base).
        plan: the plan for that checkpoint.

    Raises:
        AimerError: the plan prunes but leaves out a MoE layer of the layout.
    """

    def __init__(self, layout: ExpertLayout, plan: Plan) -> None:
        self.names = layout.arch.names
        self.mtp_base = layout.mtp_base
        self.num_experts = layout.num_experts
        self.kept = plan.kept_by_layer()
        missing = sorted(set(layout.all_layers) - set(self.kept))
        if plan.total_pruned and missing:
            # vLLM builds every MoE layer (MTP included) with the kept count: a layer the
            # plan leaves out would stream all its experts and an unsliced router.
            raise AimerError(
                f"plan {plan.plan_hash} prunes {plan.pruned_per_layer} experts per layer but "
                f"does not name MoE layers {missing} of this checkpoint.",
                "name every MoE layer in the plan (MTP layers too), or pass a plan file "
                "without MTP layers so that the loader scores them.")
        self.new_id = {layer: {old: new for new, old in enumerate(kept)}
                       for layer, kept in self.kept.items()}

    def expert(self, name: str) -> tuple[bool, str | None]:
        """(whether `name` is a routed expert's tensor in a planned layer, its new name
        or None when that expert is pruned)."""
        hit = self.names.match_expert(name, self.mtp_base)
        if hit is None or hit[0] not in self.kept:
            return False, None
        new = self.new_id[hit[0]].get(hit[1])
        return True, (None if new is None else self.names.rename_expert(name, new))

    def fused_rows(self, name: str) -> list[int] | None:
        """Kept rows (dim 0) of a fused all-experts tensor, else None."""
        fused = self.names.match_fused(name, self.mtp_base)
        return self.kept[fused[0]] if fused is not None and fused[0] in self.kept else None

    def router_rows(self, name: str) -> tuple[list[int], int] | None:
        """(kept rows, dimension) of a router tensor indexed by expert, else None."""
        layer = self.names.match_router(name, self.mtp_base)
        if layer is None or layer not in self.kept:
            return None
        return self.kept[layer], self.names.router_dim(name)

    def apply(self, weights: Iterable[tuple[str, torch.Tensor]]
              ) -> Iterator[tuple[str, torch.Tensor]]:
        """`weights` in the checkpoint's numbering (E experts), as the pruned model
        takes them: what weight reloads and RL weight sync hand a pruned model.
        A tensor already cut to another count is refused: its experts cannot be told
        apart from the checkpoint's.

        Args:
            weights: (checkpoint name, tensor) pairs.

        Yields:
            (name in the pruned model, tensor): pruned experts' tensors are left out,
            fused and router tensors come as copies holding the kept rows.

        Raises:
            AimerError: a tensor names an expert id beyond the checkpoint's count, or a
                fused or router tensor does not have the checkpoint's expert count on
                its expert dimension.
        """
        for name, tensor in weights:
            hit = self.names.match_expert(name, self.mtp_base)
            if hit is not None and hit[1] >= self.num_experts:
                raise AimerError(
                    f"weight {name} handed to the pruned model names expert {hit[1]}, but the "
                    f"checkpoint it was pruned from has {self.num_experts} experts per layer.",
                    "send weights of the checkpoint the model was loaded from (same "
                    "architecture and expert count).")
            is_expert, new_name = self.expert(name)
            if is_expert:
                if new_name is not None:
                    yield new_name, tensor
                continue
            rows = self.fused_rows(name)
            dim = 0
            if rows is None:
                router = self.router_rows(name)
                if router is not None:
                    rows, dim = router
            if rows is None:
                yield name, tensor
                continue
            if tensor.dim() <= dim or tensor.shape[dim] != self.num_experts:
                raise AimerError(
                    f"weight {name} {list(tensor.shape)} handed to the pruned model does not "
                    f"have the checkpoint's {self.num_experts} experts on dim {dim}; a model "
                    "pruned at load takes new weights in the original checkpoint's expert "
                    "numbering and prunes them with its plan.",
                    "send the full (unpruned) weights, or serve a model exported with the new "
                    "expert count without --load-format aimer.")
            index = torch.tensor(rows, dtype=torch.long, device=tensor.device)
            yield name, tensor.index_select(dim, index).contiguous()


class PrunedWeights:
    """Iterates (name, tensor) of a checkpoint with a plan applied, reading only what
    the pruned model keeps; `stats` counts what was read and skipped.

    Args:
        ckpt: the checkpoint.
        layout: its expert layout.
        plan: the plan to apply (made for this checkpoint).
    """

    def __init__(self, ckpt: Checkpoint, layout: ExpertLayout, plan: Plan) -> None:
        self.ckpt = ckpt
        self.map = PlanMap(layout, plan)
        self.num_experts = layout.num_experts
        self.stats = LoadStats()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.iterate()

    def iterate(self, skip: Callable[[str], bool] | None = None,
                window: int | None = None, threads: int = 1
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors in file order; `skip(new_name)` drops more (e.g. non-local experts).

        `window`: reopen a shard after this many bytes were read from it. A safetensors
        handle maps its whole file and every page read stays resident until the handle
        and the tensors read through it are gone, so a caller that copies tensors and
        drops them (export) keeps its memory within the window plus one tensor, instead
        of a whole shard.

        `threads` > 1 (vLLM's enable_multithread_load / num_threads): that many threads
        read the next tensors ahead (safetensors copies without holding the GIL), at
        most 2 x threads tensors in flight, still yielded in file order (`window` is
        not used then).

        Yields:
            (name in the pruned model, tensor), read from the shards as `PlanMap`
            describes.
        """
        if threads > 1:
            yield from self._iterate_threaded(skip, threads)
            return
        for file in self.ckpt.files:
            with ExitStack() as stack:
                f = stack.enter_context(safe_open(self.ckpt.path(file), framework="pt"))
                read = 0
                for name in list(f.keys()):
                    if window is not None and read >= window:
                        stack.close()
                        f = stack.enter_context(safe_open(self.ckpt.path(file), framework="pt"))
                        read = 0
                    job = self._job(name, skip)
                    if job is not None:
                        read += self.ckpt.tensors[name].nbytes
                        yield job[0], job[1](f)

    def _iterate_threaded(self, skip: Callable[[str], bool] | None,
                          threads: int) -> Iterator[tuple[str, torch.Tensor]]:
        local = threading.local()
        opened: list[Any] = []
        lock = threading.Lock()

        def read(file: str, reader: Callable[[Any], torch.Tensor]) -> torch.Tensor:
            handles = getattr(local, "handles", None)
            if handles is None:
                handles = local.handles = {}
            f = handles.get(file)
            if f is None:
                f = handles[file] = safe_open(self.ckpt.path(file), framework="pt").__enter__()
                with lock:
                    opened.append(f)
            return reader(f)

        pending: deque[tuple[str, Future[torch.Tensor]]] = deque()
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="aimer-load") as pool:
                for file, infos in self.ckpt.tensors_by_file():
                    for info in infos:
                        job = self._job(info.name, skip)
                        if job is None:
                            continue
                        pending.append((job[0], pool.submit(read, file, job[1])))
                        while len(pending) >= 2 * threads:
                            name, future = pending.popleft()
                            yield name, future.result()
                while pending:
                    name, future = pending.popleft()
                    yield name, future.result()
        finally:
            for _, future in pending:
                future.cancel()
            for f in opened:
                f.__exit__(None, None, None)

    def _job(self, name: str, skip: Callable[[str], bool] | None
             ) -> tuple[str, Callable[[Any], torch.Tensor]] | None:
        """(name to yield, how to read it from an open shard), or None when it is not
        read; the accounting happens here, in the caller's thread."""
        info = self.ckpt.tensors[name]
        is_expert, new_name = self.map.expert(name)
        if is_expert:
            if new_name is None:
                self.stats.expert_bytes_skipped += info.nbytes
                return None
            if skip is not None and skip(new_name):
                return None
            self.stats.expert_bytes_loaded += info.nbytes
            self.stats.tensors_read.add(name)
            return new_name, lambda f: f.get_tensor(name)

        kept = self.map.fused_rows(name)
        if kept is not None:
            share = info.nbytes // self.num_experts
            self.stats.expert_bytes_loaded += share * len(kept)
            self.stats.expert_bytes_skipped += share * (self.num_experts - len(kept))
            self.stats.tensors_read.add(name)

            def rows(f: Any) -> torch.Tensor:
                sl = f.get_slice(name)
                parts = [sl[a:b] for a, b in _runs(kept)]
                return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            return name, rows

        router = self.map.router_rows(name)
        if router is not None:
            kept_rows, dim = router
            index = torch.tensor(kept_rows, dtype=torch.long)
            self.stats.tensors_read.add(name)
            return name, lambda f: f.get_tensor(name).index_select(dim, index).contiguous()

        if skip is not None and skip(name):
            return None
        self.stats.tensors_read.add(name)
        return name, lambda f: f.get_tensor(name)
