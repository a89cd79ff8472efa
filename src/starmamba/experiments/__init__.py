"""The application: recipes at every scale, the demo, the ablation tables and their reports."""
