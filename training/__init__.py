"""The training library that `train_dhe.py` and `finetune.py` drive.

task.py         what a training script defines (`Task`, `TrainSettings`), its errors and shared checks;
loop.py         the one loop: `run` (`RunOptions`: processes, run folder, logs, resume) -> `fit` -> ...;
resume.py       `last_checkpoint.pth`: saving, loading, the resume tables, split digests, random states;
records.py      the other files of a run folder: metrics.csv, training_curves.png (matplotlib), results.json;
dashboard.py    `--tensorboard`: the event files (losses and lr per iteration, recalls and a picture per validation);
dhe_init.py     the DHE head's initialisation (`train_dhe.py`): `DHEInitSettings`, `DHEInitialisation`, `head_loss`;
finetuning.py   the joint fine-tuning (`finetune.py`): `FinetuneSettings`, `Finetuning`, `joint_losses`, ...

The tasks take typed settings; flags appear only as plain dicts, logged, resumed and saved.
"""
