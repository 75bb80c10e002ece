"""SLO-driven scaling policies, demand forecasting and LoRA adapter placement."""
