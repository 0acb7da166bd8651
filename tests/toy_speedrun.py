"""The toy model the speedrun tests pretrain (`--set` items): a 2-layer MoE that trains in seconds."""

TOY_PRETRAIN_MODEL = [
    "pretrain.preset=tiny-moe",
    "pretrain.model.d_model=32",
    "pretrain.model.n_heads=2",
    "pretrain.model.n_kv_heads=1",
    "pretrain.model.d_ff=64",
    "pretrain.model.moe_d_ff=16",
    "pretrain.model.n_layers=2",
    "pretrain.data.builtin_examples=300",
]
