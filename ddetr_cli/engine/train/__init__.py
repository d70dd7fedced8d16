"""Fine-tuning, in pieces (``ddetr finetune``; the public names are re-exported by
``ddetr_cli.engine.trainer``):

    dist.py        DistInfo (torchrun's world/rank), device choice, broadcast and flag agreement
    data.py        TrainSet (position-seeded augmentation), collate, epoch_batches, the loader
    model.py       the starting model, optimizer parameter groups, ModelEMA
    state.py       last.pt: RNG state, atomic save, find/load for --resume, schedule extension
    hooks.py       HookBase and the small hooks: LR schedule, early stopping, non-finite guard,
                   periodic checkpoints
    evaluation.py  evaluate_map and the hook that writes last/best.safetensors from val mAP
    results.py     results.csv, results.png and the per-epoch table
    loop.py        Trainer: run_step, the epoch loop, its hooks, interrupts; FinetuneResult
    api.py         finetune() and finetune_command()
"""
