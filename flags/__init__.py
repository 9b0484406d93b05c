"""absl flag definitions shared by every entrypoint in launch/."""
