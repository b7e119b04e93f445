"""What the recipes share: the online RLHF recipes' rewards, prompts and policies (:mod:`rh_trl.training.online`),
running training stages (:mod:`rh_trl.training.stages`), and CLoud's training data and objective
(:mod:`rh_trl.training.cloud`)."""
