"""Plans from the data: a fingerprint of the dataset, pure rules, and ``plan.yaml`` as a config layer."""
