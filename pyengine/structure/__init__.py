"""Structure: the Spec (what a pruned model keeps), gates (how a model is switched between
structures), and turning scores into a Spec at a cost target (allocate)."""
