import sys
import tensorflow as tf
print(sys.executable, tf.__version__)
