"""The report's figures: matplotlib set up once, few-shot and compare charts, the embedding map."""
