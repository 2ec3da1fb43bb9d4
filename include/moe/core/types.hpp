#pragma once
// Row-major matrix aliases and views. Activations are [tokens, features], weights are PyTorch
// nn.Linear layout [out_features, in_features]; both are row-major so a token is one contiguous row.
#include <cstddef>

#include "config.hpp"

MOE_THIRD_PARTY_BEGIN
#include <Eigen/Core>
MOE_THIRD_PARTY_END

MOE_NAMESPACE_BEGIN

using index_t = std::ptrdiff_t;

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// Zero-copy views of caller memory. Prefer these to `const Eigen::MatrixX<T>&` parameters: a
// column-major parameter type would silently copy a row-major argument into a temporary.
template <class T>
using MatrixMap = Eigen::Map<Matrix<T>>;
template <class T>
using ConstMatrixMap = Eigen::Map<const Matrix<T>>;
template <class T>
using VectorMap = Eigen::Map<Vector<T>>;
template <class T>
using ConstVectorMap = Eigen::Map<const Vector<T>>;

// Function parameters: bind to a row-major Matrix, a Map, or a row block without copying.
template <class T>
using MatrixRef = Eigen::Ref<Matrix<T>>;
template <class T>
using ConstMatrixRef = Eigen::Ref<const Matrix<T>>;

MOE_NAMESPACE_END
