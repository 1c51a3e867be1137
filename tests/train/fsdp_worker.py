"""One training process of ``test_fsdp2_across_two_ranks_*`` (launched by torchrun, or alone for the baseline).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/fsdp_worker.py SPEC.json

Builds the stage's trainer with ``alignment.train.build_trainer`` and, when there is more than one rank, the
FSDP2 arguments a GPU worker gets (``alignment.train.trainer._device_args``), on CPU, in float32 (or, with ``as_gpu``,
in a GPU worker's dtypes: bf16 autocast, a LoRA base in bf16). accelerate enables
FSDP only on GPU backends (on CPU it silently runs DDP: ../shared/docs/STACK_NOTES.md); this process lifts that
gate for itself, so that the multi-rank logic of the FSDP2 path (every decoder layer and the root sharded, the
reference model of DPO, the collective full-state-dict save) runs over gloo on a machine without GPUs. The
alignment package itself never does this: on CPU workers it runs DDP and says so.

SPEC: {method, rows, model, settings, out, eval_rows, save_at (steps), resume (a checkpoint to resume from),
as_gpu, strategy ("fsdp", the default, or "ddp": the CPU workers' own DDP, nothing lifted)}. Rank 0 writes
``<out>/result.json``: the run facts, the per-step losses, the steps this process ran, the parameters' placements
and the elements this rank holds; every rank joins the save of ``<out>/final``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def lift_accelerate_gpu_gate() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = patched


def save_at(steps: list[int], ran: list[int], evaluate: bool):
    """A checkpoint (``<out>/checkpoint-<step>``) at each of ``steps``, evaluated when there are eval rows, as
    the stage's own callback does; the steps this process runs are appended to ``ran``."""
    from transformers import TrainerCallback

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ran.append(state.global_step)
            control.should_save = state.global_step in steps
            control.should_evaluate = evaluate and control.should_save
            return control

    return SaveAt()


def main() -> None:
    from torch.distributed.tensor import DTensor

    from alignment import train

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    settings = dict(spec["settings"])
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    as_gpu = spec.get("as_gpu", False)
    fsdp = ranks > 1 and spec.get("strategy", "fsdp") == "fsdp"
    gpu_args = train.trainer._device_args({**settings, "use_gpu": True, "strategy": "fsdp" if fsdp else "auto"})
    if fsdp:
        lift_accelerate_gpu_gate()
        assert gpu_args["fsdp_config"]["version"] == 2, gpu_args
    if fsdp or as_gpu:
        # On the CPU; in float32 unless ``as_gpu``: then bf16 autocast and a LoRA base loaded in bf16, as on GPU.
        args = {**gpu_args, "use_cpu": True, **({} if as_gpu else {"bf16": False})}
        train.trainer._device_args = lambda s: args
    if as_gpu:
        load = train.trainer._load_model
        train.trainer._load_model = lambda path, use_gpu, lora=False: load(path, True, lora)
    trainer = train.build_trainer(spec["method"], spec["rows"], spec["model"], settings, str(out),
                                  eval_rows=spec.get("eval_rows"))
    ran: list[int] = []
    trainer.add_callback(save_at(spec.get("save_at", []), ran, bool(spec.get("eval_rows"))))
    trainer.train(resume_from_checkpoint=spec.get("resume"))
    params = list(trainer.model.parameters())
    result = {
        "facts": train.run_facts(trainer),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],  # a resumed run's history too
        "steps_run": ran,
        "eval_losses": [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h],
        "placements": sorted({str(p.placements) if isinstance(p, DTensor) else "plain" for p in params}),
        "local_elements": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
    }
    trainer.save_model(str(out / "final"))  # collective under FSDP: every rank gathers, rank 0 writes
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
