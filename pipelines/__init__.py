"""The Kubeflow pipeline wiring the components: compile, run locally, submit to a KFP host."""
