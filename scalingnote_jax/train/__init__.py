"""Trainers, one readable file per stage, and the losses they share."""
