"""Mixture-of-LoRA-Experts (LLaVA-MoLE) finetuning of LLaVA under DeepSpeed."""
