#pragma once
// A weight matrix that either views caller memory (zero copy, the usual case: a checkpoint
// already loaded into the caller's buffers) or owns its storage. Copies of an owning Weight own
// a copy; copies of a view view the same memory.
#include <limits>
#include <utility>

#include "error.hpp"
#include "types.hpp"

MOE_NAMESPACE_BEGIN

template <class T>
class Weight {
 public:
  Weight() = default;

  // Views `rows x cols` row-major elements at `data`; the caller keeps them alive.
  static Weight view(const T* data, index_t rows, index_t cols) {
    if (rows < 0 || cols < 0) detail::throw_invalid("Weight::view: negative shape (rows = ", rows, ", cols = ", cols, ")");
    if (cols > 0 && rows > std::numeric_limits<index_t>::max() / static_cast<index_t>(sizeof(T)) / cols) {
      detail::throw_invalid("Weight::view: ", rows, "x", cols, " elements exceed the address space");
    }
    if (data == nullptr && rows > 0 && cols > 0) detail::throw_invalid("Weight::view: data is null for a ", rows, "x", cols, " weight");
    Weight w;
    w.data_ = data;
    w.rows_ = rows;
    w.cols_ = cols;
    return w;
  }
  static Weight view(const ConstMatrixMap<T>& m) { return view(m.data(), m.rows(), m.cols()); }

  // Takes ownership of `m`.
  static Weight own(Matrix<T> m) {
    Weight w;
    w.owned_ = std::move(m);
    w.owns_ = true;
    w.rebind();
    return w;
  }

  Weight(const Weight& other) : owned_(other.owned_), data_(other.data_), rows_(other.rows_), cols_(other.cols_), owns_(other.owns_) {
    rebind();
  }
  Weight(Weight&& other) noexcept
      : owned_(std::move(other.owned_)), data_(other.data_), rows_(other.rows_), cols_(other.cols_), owns_(other.owns_) {
    rebind();
  }
  Weight& operator=(Weight other) noexcept {
    swap(other);
    return *this;
  }
  void swap(Weight& other) noexcept {
    owned_.swap(other.owned_);
    std::swap(data_, other.data_);
    std::swap(rows_, other.rows_);
    std::swap(cols_, other.cols_);
    std::swap(owns_, other.owns_);
    rebind();
    other.rebind();
  }

  index_t rows() const noexcept { return rows_; }
  index_t cols() const noexcept { return cols_; }
  const T* data() const noexcept { return data_; }
  bool owns() const noexcept { return owns_; }
  ConstMatrixMap<T> map() const noexcept { return ConstMatrixMap<T>(data_, rows_, cols_); }

 private:
  void rebind() noexcept {
    if (owns_) {
      data_ = owned_.data();
      rows_ = owned_.rows();
      cols_ = owned_.cols();
    }
  }

  Matrix<T> owned_;
  const T* data_ = nullptr;
  index_t rows_ = 0;
  index_t cols_ = 0;
  bool owns_ = false;
};

MOE_NAMESPACE_END
