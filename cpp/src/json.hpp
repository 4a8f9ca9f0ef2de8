// A small JSON reader and writer: the manifest, tokenizer.json and the CLI's output are all this host reads or
// writes, so a full library would be a dependency for little. Numbers keep their text so ints stay exact.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace dspark::json {

class Value {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  Value() = default;
  static Value parse(const std::string& text);  // throws std::runtime_error with the offset of the problem

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::Null; }
  bool is_object() const { return kind_ == Kind::Object; }
  bool is_array() const { return kind_ == Kind::Array; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_number() const { return kind_ == Kind::Number; }

  // typed access; throws std::runtime_error naming `what` when the value has another kind
  const std::string& str(const char* what = "value") const;
  int64_t integer(const char* what = "value") const;
  double number(const char* what = "value") const;
  bool boolean(const char* what = "value") const;
  const std::vector<Value>& items(const char* what = "value") const;
  const std::vector<std::pair<std::string, Value>>& members(const char* what = "value") const;

  bool has(const std::string& key) const;
  const Value* find(const std::string& key) const;  // nullptr when absent (or not an object)
  const Value& at(const std::string& key) const;     // throws naming the key when absent

 private:
  friend class Parser;
  Kind kind_ = Kind::Null;
  bool bool_ = false;
  std::string text_;  // string contents, or a number's literal text
  std::vector<Value> items_;
  std::vector<std::pair<std::string, Value>> members_;
  std::map<std::string, size_t> index_;
};

// Writers that format the way Python's json.dumps does (", " and ": " separators, ensure_ascii, float repr),
// so the host's --json and --trace lines are byte-comparable with `dspark generate`.
std::string quote(const std::string& utf8);
std::string number(double x);  // Python repr of a float (shortest round-trip digits)

}  // namespace dspark::json
