"""A Res-CR-Net with an LSTM RES block (as the authors' microscopy network, here for lungs):
STEM + 4 CONV RES + 1 LSTM RES, grayscale in, 2 classes; otherwise the authors' lung training
(Adam 1e-3, weighted Tanimoto, batch 8). Defaults to phantoms at 128 x 128; use
``--set data.source=folder --set data.path=...`` and ``--set data.height=300 --set data.width=340``
for real films.
"""
from crnet_jax.config import ModelConfig
from crnet_jax.train_config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig

config = TrainConfig(
    model=ModelConfig(num_conv_res=4, num_lstm_res=1),
    data=DataConfig(source="phantom", height=128, width=128, num_train=800, num_val=64),
    optim=OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100, min_lr_ratio=0.05),
    checkpoint=CheckpointConfig(every=500, keep=2),
    loss="tanimoto_weighted",
    batch_size=8,
    num_steps=5_000,
    eval_every=250,
    log_every=20,
    label="LSTM RES variant",
)
