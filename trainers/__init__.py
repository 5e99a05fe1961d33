"""Training for every stage of the RxT curriculum: transformers.Trainer stages (1-4), MRL and RxRLHF (transformers.Trainer on TRL's GRPO / DPO configs), data and rewards."""
