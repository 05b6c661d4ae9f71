"""The planner: hardware profiles, the analytic model of a layout, the layout search and the seed audit."""
