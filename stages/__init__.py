"""Stages: one package per stage, each with small backends behind a registry."""
