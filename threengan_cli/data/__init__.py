"""Data before training: splitting a site's X-rays by patient."""
