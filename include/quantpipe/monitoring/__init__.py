"""Stage 6: quality probe, pipeline metrics on a Pushgateway, latency SLO from Prometheus (no Airflow imports)."""
