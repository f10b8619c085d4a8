"""The distillation loop's parts: `setup` (data, seeds, teacher and student), `state` (the plan and the
resumable state), `step` (one optimizer step), `callbacks` (metrics, probes, checkpoints, signals, moving
teachers). The loop itself, which reads top to bottom, is `randteach.distill`."""
