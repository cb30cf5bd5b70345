"""Class-conditional accuracy of digits samples, judged by a classifier fitted on real digits.

Fits an SVM on the digits train split (the first 1500 of scikit-learn's 1797, as the tfds
builder splits them) at 8x8, reports its accuracy on the held-out 297, then generates
`--samples_per_class` images per class from a pretrained directory (the embedded default's
`WORKDIR/transformer/pretrained`) and reports how often the classifier agrees with the
requested class.

  python benchmarks/digits_sample_accuracy.py \
    --pretrained=/tmp/maskgit_digits/transformer/pretrained
"""

import argparse

import jax
import numpy as np
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from maskgit_jax.data.datasets.digits import NUM_TEST
from maskgit_jax.sampling.pipeline import MaskGITPipeline


def to_digit_features(images: np.ndarray) -> np.ndarray:
    """RGB [N, S, S, 3] in [0, 1] -> grayscale 8x8 block means, flattened [N, 64], in [0, 1]."""
    gray = images.mean(axis=-1)
    factor = gray.shape[1] // 8
    pooled = gray.reshape(len(gray), 8, factor, 8, factor).mean(axis=(2, 4))
    return pooled.reshape(len(gray), 64)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--samples_per_class", type=int, default=50)
    parser.add_argument("--num_steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    digits = load_digits()
    features = digits.images.reshape(len(digits.images), 64) / 16.0
    train_x, test_x = features[:-NUM_TEST], features[-NUM_TEST:]
    train_y, test_y = digits.target[:-NUM_TEST], digits.target[-NUM_TEST:]
    classifier = SVC(gamma="scale").fit(train_x, train_y)
    real_accuracy = float(np.mean(classifier.predict(test_x) == test_y))
    print(f"classifier accuracy on the {NUM_TEST} held-out real digits: {100 * real_accuracy:.1f}%")

    pipe = MaskGITPipeline.from_pretrained(args.pretrained)
    labels = np.repeat(np.arange(pipe.config.num_classes), args.samples_per_class)
    images = pipe.generate(labels, jax.random.PRNGKey(args.seed), num_steps=args.num_steps)
    predicted = classifier.predict(to_digit_features(images))
    accuracy = float(np.mean(predicted == labels))
    print(
        f"class-conditional accuracy of {len(labels)} samples "
        f"(T={args.num_steps or pipe.config.sampling.num_steps}): {100 * accuracy:.1f}%"
    )
    per_class = [float(np.mean(predicted[labels == c] == c)) for c in range(10)]
    print("per class: " + " ".join(f"{c}:{100 * a:.0f}%" for c, a in enumerate(per_class)))


if __name__ == "__main__":
    main()
