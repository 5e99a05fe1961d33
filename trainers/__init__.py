"""Training for every stage of the RxT curriculum: Accelerate loops (stages 1-4), TRL-derived trainers (MRL, RxRLHF), data and rewards."""
