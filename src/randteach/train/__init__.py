"""Training. `loop` is the distillation loop, top to bottom (`distill(cfg)`); its parts are `setup`
(device, seeds, data order, teacher and student), `state` (the plan and the resumable state), `step` (one
optimizer step) and `callbacks` (metrics, probes, checkpoints, signals, moving teachers). Beside it:
`teacher_cache` (the frozen teacher's outputs, computed once), `distributed` (torchrun), `stacked` (K runs
of a sweep as one vmapped model), `side_by_side` (K runs of a sweep each by the solo loop, side by side on the
cores) and `supervised` (the supervised loop of finetune, IMP, LMC and the LR range test)."""
