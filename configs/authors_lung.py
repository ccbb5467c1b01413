"""The Res-CR-Net authors' lung training: Adam 1e-3, contour-weighted dual Tanimoto loss,
300 x 340 (H x W) inputs with global histogram equalisation, batch 8, the lung network
(STEM + 5 CONV RES + head, 58,309 parameters), Keras BatchNorm momentum 0.99.

Point it at real data, e.g.::

    python -m crnet_jax.train --config configs/authors_lung.py \
        --set data.source=folder --set data.path=../shared/data/mcsz512
"""
from crnet_jax.augment import AugmentConfig
from crnet_jax.config import ModelConfig
from crnet_jax.train_config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig

config = TrainConfig(
    model=ModelConfig(num_conv_res=5, num_lstm_res=0, dropout_rate=0.05, bn_momentum=0.99),
    data=DataConfig(source="phantom", height=300, width=340, num_train=800, num_val=100,
                    contrast="equalize", resize_mode="stretch", augment=True),
    augment=AugmentConfig.authors(),
    optim=OptimConfig(learning_rate=1e-3, schedule="constant"),
    checkpoint=CheckpointConfig(every=500, keep=3),
    loss="tanimoto_weighted",
    batch_size=8,
    num_steps=20_000,
    eval_every=500,
    log_every=20,
    val_metric="dice",
    early_stopping_patience=10,
    label="authors' lung setup",
)
