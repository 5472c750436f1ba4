#include "formats/safetensors_header.h"

#include <nlohmann/json.hpp>

namespace fastckpt {
namespace {

using json = nlohmann::json;

// Events arrive with `depth_` = containers open before the event: 0 the root,
// 1 an entry's value, 2 a field's value, 3 an element of a field's list.
class HeaderSax {
 public:
  explicit HeaderSax(SafetensorsHeader& out) : out_(out) {}

  bool null() { return scalar(false, nullptr, nullptr); }
  bool boolean(bool) { return scalar(false, nullptr, nullptr); }
  bool number_integer(json::number_integer_t) { return scalar(false, nullptr, nullptr); }
  bool number_unsigned(json::number_unsigned_t v) { return scalar(true, &v, nullptr); }
  bool number_float(json::number_float_t, const std::string&) { return scalar(false, nullptr, nullptr); }
  bool string(std::string& s) { return scalar(false, nullptr, &s); }
  bool binary(json::binary_t&) { return scalar(false, nullptr, nullptr); }

  bool start_object(std::size_t) { return open(true); }
  bool start_array(std::size_t) { return open(false); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }

  bool key(std::string& k) {
    if (depth_ == 1) {  // keys at depth 1 exist only when the root is an object
      field_ = Field::Other;
      in_metadata_ = k == "__metadata__";
      if (in_metadata_) {
        out_.has_metadata = true;
        out_.metadata_is_object = false;
        out_.metadata.clear();
        out_.metadata_bad_key.reset();
      } else {
        out_.entries.emplace_back().name = k;  // a copy: moving would take the lexer's buffer, regrown for every key
      }
    } else if (depth_ == 2 && live_) {
      if (in_metadata_) {
        meta_key_ = k;
      } else {
        field_ = k == "dtype" ? Field::Dtype
               : k == "shape" ? Field::Shape
               : k == "data_offsets" ? Field::Offsets
                                     : Field::Other;
        if (HeaderList* list = current_list()) *list = HeaderList{true, false, 0, 0, SIZE_MAX};
        if (field_ == Field::Dtype) {
          entry().has_dtype = true;
          entry().dtype_is_string = false;
        }
      }
    }
    return true;
  }

  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) {
    return false;
  }

 private:
  enum class Field { Dtype, Shape, Offsets, Other };

  HeaderEntry& entry() { return out_.entries.back(); }

  HeaderList* current_list() {
    if (field_ == Field::Shape) return &entry().shape;
    if (field_ == Field::Offsets) return &entry().offsets;
    return nullptr;
  }

  void element(HeaderList& list, const uint64_t* v) {
    if (v == nullptr && list.first_bad == SIZE_MAX) list.first_bad = list.count;
    out_.values.push_back(v != nullptr ? *v : 0);
    ++list.count;
  }

  // A value starts at the current depth: what it means depends on where it is.
  void value_starts(bool is_container, bool is_object, const std::string* str,
                    const uint64_t* u64) {
    switch (depth_) {
      case 0:
        out_.root_is_object = is_object;
        break;
      case 1:
        live_ = out_.root_is_object && is_object;
        if (!out_.root_is_object) break;  // an element of a root list: refused already
        if (in_metadata_) out_.metadata_is_object = is_object;
        else entry().is_object = is_object;
        break;
      case 2:
        if (!live_) break;
        if (in_metadata_) {
          if (str != nullptr) out_.metadata.emplace_back(meta_key_, *str);
          else if (!out_.metadata_bad_key) out_.metadata_bad_key = meta_key_;
        } else if (field_ == Field::Dtype) {
          entry().dtype_is_string = str != nullptr;
          if (str != nullptr) entry().dtype = *str;
        } else if (HeaderList* list = current_list()) {
          list->is_list = is_container && !is_object;
          list->begin = out_.values.size();
          list->count = 0;
        }
        break;
      case 3:
        if (live_ && !in_metadata_) {
          if (HeaderList* list = current_list(); list != nullptr && list->is_list) element(*list, u64);
        }
        break;
      default:
        break;  // inside a value already judged (a nested element is a bad element)
    }
  }

  bool scalar(bool is_u64, const uint64_t* v, const std::string* s) {
    value_starts(false, false, s, is_u64 ? v : nullptr);
    return true;
  }

  bool open(bool is_object) {
    value_starts(true, is_object, nullptr, nullptr);
    ++depth_;
    return true;
  }

  bool close() {
    --depth_;
    return true;
  }

  SafetensorsHeader& out_;
  int depth_ = 0;
  bool live_ = false;  // the value at depth 1 is an entry object of the root object
  bool in_metadata_ = false;
  Field field_ = Field::Other;
  std::string meta_key_;
};

}  // namespace

SafetensorsHeader parse_safetensors_header(const char* text, size_t n, size_t expected_entries) {
  SafetensorsHeader out;
  out.entries.reserve(expected_entries);
  out.values.reserve(expected_entries * 4);
  HeaderSax sax(out);
  out.valid_json = json::sax_parse(text, text + n, &sax, nlohmann::json::input_format_t::json,
                                   /*strict=*/true);
  return out;
}

}  // namespace fastckpt
