"""KFP v2 components: one per pipeline stage, each running `mammoseg <stage>` in the project image."""
