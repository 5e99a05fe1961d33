"""Training for every stage of the RxT curriculum: transformers.Trainer stages (1-4), TRL-derived trainers (MRL, RxRLHF), data and rewards."""
