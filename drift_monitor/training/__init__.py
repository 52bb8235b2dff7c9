"""Building what the monitor needs when nobody published it: a base SAE (``train_sae``, with
its activation data in ``sae_data``) and CPU-safe LoRA fine-tuning settings (``finetune``)."""
