"""The control plane: state, pools, jobs, tenants, power, the admin API and the CLI."""
